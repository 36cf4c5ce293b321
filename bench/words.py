"""Common English words, for the deterministic pseudo-English corpora of the benchmarks."""

WORDS = """
the of and to in is was that for it as with be on not he by are this at from his but they
have had an which one you were her all she there would their we him been has when who will
more no if out so said what up its about into than them can only other new some could time
these two may then do first any my now such like our over man me even most made after also
did many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old
year off come since against go came right used take three states himself few house use during
without again place american around however home small found thought went say part once
general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet
government system better set told nothing night end why called didn't eyes find going look
asked later knew point next program city business give group toward young days let room
president side social given present several order national possible rather second face per
among form important often things looking early white case john become large big need four
within felt children along saw best church ever least power development light thing seemed
family interest want members mind country area others done turned although open god service
problem certain kind began different door thus help sense means whole matter perhaps itself
york times human law line above name example action company hands local show whether five
history gave today either act feet across taken past quite anything seen having death body
experience half really week words field car already information tell college shall together
money period held keep sure probably free seems political real behind cannot miss question
air office making brought whose special major heard problems ago became federal moment study
available known result street economic boy position reason change south board individual job
society areas west close turn love community true court force full seem am policy
""".split()
